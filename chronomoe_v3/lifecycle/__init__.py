"""The slow clock, host side: the free-energy objective, selection, the decision log and the review cycle."""
