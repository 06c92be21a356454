"""Samplers: each has one method, ``sample()``, returning trace sample records."""
