"""Data: captions, images, shards and the training stream."""
