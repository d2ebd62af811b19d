"""mini-MTIL: procedural image tasks and a small CLIP pre-trained and shipped by the project."""
