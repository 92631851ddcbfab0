"""quantlab's data, with no torch or transformers behind it: what a record holds (`record.py`), what a
measurement found (`measurement.py`), and what produced it (`environment.py`). The store, the report and
the build manifest read these anywhere, a machine without torch included."""
