"""Data definitions shared by the build (``pipeline``) and the trainers: the dataset schema and stable ids."""
