"""Test suite (a package, so helpers import as tests.<module> even beside a stray site-packages `tests`)."""
