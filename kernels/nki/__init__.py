"""NKI kernels (``verify_attention``, ``kv_append``) and verispec's NKI interpreter.

* ``_nki``: the import indirection (AWS's ``nki`` when importable, else ``interp``);
* ``kv_append``, ``verify_attention``: the kernels, NKI 0.3 dialect;
* ``backend``: torch wrappers, registered lazily as kernel backend ``"nki"``;
* ``interp``: the NumPy interpreter of the NKI subset, enforcing Trainium's tile rules.
"""
