"""The filter stage: FAISS distribution matching and inverse-propensity weights (stage.py), FAISS
helpers (knn.py); its config section `filter` (config.py)."""
