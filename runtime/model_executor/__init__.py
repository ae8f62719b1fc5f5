"""model_executor"""
