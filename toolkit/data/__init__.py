"""The instruction data set: schema validation, statistics and prompt rendering."""
