"""model_loader"""
