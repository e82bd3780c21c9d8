"""Tracking: the MLflow store, the runs, and the logger callback that reads the training's history."""
