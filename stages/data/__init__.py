"""Data sources and formats: the VADER corpora, user tables, preference-dataset formats, the
records schema, and the token rules every encoder follows."""
