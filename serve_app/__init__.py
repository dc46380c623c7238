"""Ray Serve server for Z-Image-Turbo."""
