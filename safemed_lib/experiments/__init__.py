"""The papers' experiments as functions of a profile's config: what each notebook runs, in the library."""
