"""The peer suite: walkerOS 4.4.0's own tests restated as data (see tests/test_peer.py)."""
