"""The distill stage: the training loop (stage.py), the transfer-set stream (data.py), augmentation
(augment.py), the student's extra modules (model.py), the loss functions (losses.py) and the loss
methods, one file each (methods/); its config section `distill` (config.py)."""
