"""The metadata service keeps only its delivery tables (schema `metadata`)."""

from sqlalchemy import MetaData

metadata = MetaData(schema="metadata")
