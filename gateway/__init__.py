"""Tollgate's HTTP gateway: authentication, validation, task records, results."""
