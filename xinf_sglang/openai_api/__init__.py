"""openai_api"""
