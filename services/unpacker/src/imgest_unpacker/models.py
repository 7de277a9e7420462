"""The unpacker keeps only its delivery tables (schema `unpacker`)."""

from sqlalchemy import MetaData

metadata = MetaData(schema="unpacker")
