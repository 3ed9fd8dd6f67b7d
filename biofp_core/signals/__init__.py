"""Reading WFDB records, preprocessing to 10 s windows at 125 Hz, and signal quality."""
