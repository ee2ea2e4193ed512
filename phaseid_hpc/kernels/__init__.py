"""Pure array kernels: functions of ``(n_meters, n_time)`` arrays on NumPy or CuPy (array API).

No xarray, Dask, files or logging in here; the array namespace is taken from the inputs.
"""
