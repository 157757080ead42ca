"""Model catalogue and quoting.

Pure: no I/O beyond reading the catalogue file it is handed, no clock, and no
import of any other Tollgate package. Money is an integer count of micro-credits
(see ``pricing.money``).
"""
