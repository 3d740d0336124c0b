"""Building and updating the image index: scan -> diff -> decode -> encode -> store -> snapshot."""
