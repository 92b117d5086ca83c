"""What a conversion will do, from headers alone: the plan, the table layout, the trade."""
