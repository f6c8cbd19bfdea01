"""`make bench`: every benchmark figure beside a ceiling measured in the same run (see `__main__`)."""
