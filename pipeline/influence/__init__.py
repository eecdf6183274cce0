"""The maths of Influence-SSL, independent of Ray and of storage."""
