"""bestie.models"""
