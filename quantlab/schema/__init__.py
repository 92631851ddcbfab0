"""quantlab's data, with no torch or transformers behind it: what a record holds (`record.py`), what a
measurement found (`measurement.py`), what produced it (`environment.py`), a build's manifest (`build.py`) and
an estimate (`estimate.py`), each class a `frozen.Frozen`. The store, the report and the build manifest read
these anywhere, a machine without torch included."""
