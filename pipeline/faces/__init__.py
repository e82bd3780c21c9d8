"""Faces: the Kaggle CSV layout, the synthetic face set, the prepared arrays and their augmentation."""
