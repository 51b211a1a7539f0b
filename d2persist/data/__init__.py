"""Datasets that ship with d2persist (see :mod:`d2persist.data.shapes`)."""
