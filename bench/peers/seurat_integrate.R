# Seurat 4.3 CCA integration (FindIntegrationAnchors -> IntegrateData -> ScaleData -> RunPCA)
# at its defaults, for bench/peers/seurat.py. Usage:
#   Rscript seurat_integrate.R <dir> <dims> <nfeatures> <exact_nn 0|1>
# <dir> holds counts.mtx (genes x cells, Matrix Market), genes.txt, cells.txt, batch.txt (one
# batch name per cell, input order); cells are named c0, c1, ... by input position. Writes to
# <dir>: embedding.csv (integrated PCA, input cell order), anchors.csv (cell1, cell2 as input
# positions, score, dataset1, dataset2 as batch names), features.txt, seconds.txt.
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]
dims <- as.integer(args[2])
nfeatures <- as.integer(args[3])
exact <- args[4] == "1"
suppressPackageStartupMessages({
  library(Matrix)
  library(Seurat)
})
counts <- as(readMM(file.path(dir, "counts.mtx")), "CsparseMatrix")
rownames(counts) <- readLines(file.path(dir, "genes.txt"))
cells <- readLines(file.path(dir, "cells.txt"))
colnames(counts) <- cells
batch <- readLines(file.path(dir, "batch.txt"))
obj <- CreateSeuratObject(counts, min.cells = 0, min.features = 0)
obj$batch <- batch
t0 <- proc.time()[["elapsed"]]
lst <- SplitObject(obj, split.by = "batch")
lst <- lst[sort(names(lst), method = "radix")]  # datasets in sorted (C-locale) order
lst <- lapply(lst, function(x) {
  x <- NormalizeData(x, verbose = FALSE)
  FindVariableFeatures(x, selection.method = "vst", nfeatures = nfeatures, verbose = FALSE)
})
features <- SelectIntegrationFeatures(lst, nfeatures = nfeatures, verbose = FALSE)
anchors <- FindIntegrationAnchors(lst, anchor.features = features, dims = 1:dims,
                                  nn.method = if (exact) "rann" else "annoy", verbose = FALSE)
integ <- IntegrateData(anchors, dims = 1:dims, verbose = FALSE)
DefaultAssay(integ) <- "integrated"
integ <- ScaleData(integ, verbose = FALSE)
integ <- RunPCA(integ, npcs = dims, verbose = FALSE)
seconds <- proc.time()[["elapsed"]] - t0
emb <- Embeddings(integ, "pca")
pos <- as.integer(sub("^c", "", rownames(emb)))
out <- matrix(NA_real_, nrow = length(cells), ncol = ncol(emb))
out[pos + 1, ] <- emb
write.table(out, file.path(dir, "embedding.csv"), sep = ",", row.names = FALSE,
            col.names = FALSE)
a <- anchors@anchors
names_of <- lapply(anchors@object.list, colnames)
to_pos <- function(ds, idx) {
  nm <- mapply(function(d, i) names_of[[d]][i], ds, idx)
  as.integer(sub("_[0-9]+$", "", sub("^c", "", nm)))
}
ds_names <- names(lst)
write.csv(data.frame(cell1 = to_pos(a$dataset1, a$cell1), cell2 = to_pos(a$dataset2, a$cell2),
                     score = a$score, dataset1 = ds_names[a$dataset1],
                     dataset2 = ds_names[a$dataset2]),
          file.path(dir, "anchors.csv"), row.names = FALSE)
writeLines(features, file.path(dir, "features.txt"))
writeLines(format(seconds, digits = 10), file.path(dir, "seconds.txt"))
