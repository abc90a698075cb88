"""Test peers and helpers: local protocol servers and drivers."""
