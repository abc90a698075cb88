"""Cross-cutting pieces of the API: errors, pagination, logging, metrics, overload protection."""
