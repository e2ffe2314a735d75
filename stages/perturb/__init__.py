"""The perturb stage: MixDistribution versions of the kept images, the student's transfer set
(stage.py); its config section `perturb` (config.py)."""
