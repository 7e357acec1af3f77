"""Training: optimizer and schedules, losses, EMA, train state, the jitted step and the loop."""
