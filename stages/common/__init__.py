"""What several stages share: the model registry (models.py), teacher and embedder loading and the
teacher's config section (teacher.py, config.py), the student (student.py), MixDistribution
(mixing.py), images in samples and folders (images.py), figures as PNG (plots.py), FAISS from
whichever build is installed (faiss_import.py)."""
