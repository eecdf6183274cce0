"""Test suite: a package, so `tests.<module>` imports survive a stray site-packages `tests`."""
