"""EAGLE speculative decoding: draft trees (tree.py), their verification (verify.py), the engine
step that drafts and verifies (eagle.py); draft training (train/) is off the serving path."""
