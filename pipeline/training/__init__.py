"""Training: the loop and its hooks, the callbacks, checkpoints, schedules, the optimizer and the device.

It reads no params and imports no MLflow: the train stage hands it what it needs."""
