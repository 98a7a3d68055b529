"""HTTP routes, request and response schemas, and error handling."""
