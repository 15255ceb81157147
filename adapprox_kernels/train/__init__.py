"""The main job: train a small GPT with Adapprox and its peers, and compare them."""
