"""What leaves the machine: the model card and the hub upload."""
