"""The playground: a page the project serves itself, to watch the token stream work in a browser."""
