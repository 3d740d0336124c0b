"""Indexing engines other than the local one (clipgrep.index): Ray Data into LanceDB."""
