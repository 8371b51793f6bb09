"""The data layer: schemas, validation, de-duplication, splitting, tokenisation, the curated store."""
