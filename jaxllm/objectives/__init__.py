"""Training objectives: functions of (model outputs, batch) -> summed loss and counts."""
