"""Images synthesised from the teacher: model inversion (DeepInversion; ``inversion.py``), from noise or,
for webdistill's hybrid, from kept web images."""
