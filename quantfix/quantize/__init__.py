"""Stage: quantize. ``bank.WeightBank`` applies a Plan to the live model (simulated) and restores it;
``algorithms`` holds one entry per algorithm; ``fake`` the tensor math; ``calib`` the statistics."""
