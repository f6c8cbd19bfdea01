"""The read service: projects the event stream into Redis views and answers queries from them."""
