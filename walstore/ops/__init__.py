"""Operations on a store from outside its writer: verify, backup, WAL inspection."""
