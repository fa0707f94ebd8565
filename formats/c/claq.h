/*
 * claq.h - a reference reader for .claq files, versions 1 to 4 (formats/claq-v2.md, which also covers
 * version 1).
 *
 * Written from the format specification alone. C99, libc only; define CLAQ_WITH_ZLIB (and link -lz)
 * to inflate zlib-encoded embedded files. Without it every other check still runs, and reading a
 * zlib-encoded embedded file answers CLAQ_NOT_INFLATABLE (a limit of this build, not a format error).
 *
 * Steps 1-4 of the spec's order of checks (section 8: preamble, header JSON and schema, placement) run
 * when a file is opened; step 5 (checksums, tensor contents) the first time a tensor is checked or
 * decoded; step 6 (checksum, decoding) when an embedded file is read; claq_validate() runs step 7
 * (everything, then the padding bytes). Every failure is one of the spec's error categories
 * (claq_status values CLAQ_TRUNCATED_FILE .. CLAQ_BAD_FILE_DATA) with a one-line message.
 *
 * A claq_reader is not safe for concurrent use from several threads (it caches checked tensors).
 */
#ifndef CLAQ_H
#define CLAQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum claq_status {
    CLAQ_OK = 0,
    /* the spec's error categories (section 8), in the order of its checks */
    CLAQ_TRUNCATED_FILE = 1,     /* "TruncatedFile" */
    CLAQ_BAD_MAGIC = 2,          /* "BadMagic" */
    CLAQ_UNSUPPORTED_VERSION = 3,/* "UnsupportedVersion" */
    CLAQ_BAD_HEADER = 4,         /* "BadHeader" */
    CLAQ_BAD_LAYOUT = 5,         /* "BadLayout" */
    CLAQ_CHECKSUM_MISMATCH = 6,  /* "ChecksumMismatch" */
    CLAQ_BAD_TENSOR_DATA = 7,    /* "BadTensorData" */
    CLAQ_BAD_FILE_DATA = 8,      /* "BadFileData" */
    /* not format errors */
    CLAQ_NOT_INFLATABLE = 9,     /* "NotInflatable": a zlib embedded file, built without CLAQ_WITH_ZLIB */
    CLAQ_IO_ERROR = 10,          /* "IOError": the path could not be read */
    CLAQ_OUT_OF_MEMORY = 11,     /* "OutOfMemory" */
    CLAQ_INVALID_ARGUMENT = 12   /* "InvalidArgument": a bad call (index out of range, buffer too small) */
} claq_status;

/* A status and its one-line message (no newline; at most 255 bytes). */
typedef struct claq_error {
    claq_status status;
    char message[256];
} claq_error;

/* The category name of a status ("BadHeader", ...; "OK" for CLAQ_OK). Never NULL. */
const char *claq_status_name(claq_status status);

/* 1 when this build inflates zlib-encoded embedded files (CLAQ_WITH_ZLIB), else 0. */
int claq_have_zlib(void);

typedef enum claq_dtype {
    CLAQ_F32 = 0, CLAQ_F16, CLAQ_BF16, CLAQ_F64, CLAQ_I64, CLAQ_I32, CLAQ_I16, CLAQ_I8,
    CLAQ_U8, CLAQ_U16, CLAQ_U32
} claq_dtype;

typedef enum claq_kind { CLAQ_KIND_RAW = 0, CLAQ_KIND_CLAQ = 1 } claq_kind;

typedef struct claq_tensor_info {
    const char *name;       /* UTF-8, NUL-terminated; may itself hold U+0000: name_len is authoritative */
    size_t name_len;
    claq_kind kind;
    unsigned ndim;          /* 1..8 (2 for a claq tensor: [out, in]) */
    uint64_t shape[8];
    uint64_t count;         /* product of shape, or UINT64_MAX if it overflows (such a tensor never passes
                               claq_check_tensor: a valid claq weight has out*in <= 8 * its code bytes) */
    claq_dtype dtype;       /* raw: the stored dtype of its data; claq: CLAQ_F32 (what decoding gives) */
} claq_tensor_info;

typedef struct claq_embedded_info {
    const char *name;       /* a plain file name, NUL-terminated */
    size_t name_len;
    int zlib;               /* 0: stored as is ("none", or any version-1 file), 1: one zlib stream */
    uint64_t size;          /* decoded size in bytes */
    uint64_t stored_length; /* bytes in the file */
} claq_embedded_info;

typedef struct claq_reader claq_reader;

/* Opens a file held in memory (steps 1-4). The buffer is not copied: it must outlive the reader. On
 * success *out is a new reader; on failure *out is NULL and err (if not NULL) says why. */
claq_status claq_open_memory(const void *data, size_t size, claq_reader **out, claq_error *err);

/* Reads a whole file into memory (owned by the reader) and opens it. */
claq_status claq_open_path(const char *path, claq_reader **out, claq_error *err);

void claq_close(claq_reader *reader);

unsigned claq_version(const claq_reader *reader);           /* 1, 2, 3 or 4 */

/* The header's JSON text (without its padding), e.g. to read metadata.config. */
const char *claq_header_json(const claq_reader *reader, size_t *length);

size_t claq_tensor_count(const claq_reader *reader);        /* in header order */
claq_status claq_tensor_info_at(const claq_reader *reader, size_t index, claq_tensor_info *info);
/* Index of the tensor named `name` (length name_len), or -1 if none. */
long long claq_find_tensor(const claq_reader *reader, const char *name, size_t name_len);

/* Step 5 for one tensor: the CRC-32 of each section, then its contents (section 7.5; coded levels and coded
 * code streams are checked and decoded too, without allocating). Cached. */
claq_status claq_check_tensor(claq_reader *reader, size_t index, claq_error *err);

/* Checks the tensor (as claq_check_tensor) and writes its count float32 values, row-major, to dst
 * (dst_count must be at least count). Claq tensors: the decoded W[out, in]; raw tensors: the values
 * converted to float32 (F16/BF16 exactly, F64 and integers rounded to nearest). */
claq_status claq_decode_tensor(claq_reader *reader, size_t index, float *dst, size_t dst_count, claq_error *err);

size_t claq_embedded_count(const claq_reader *reader);      /* in header order */
claq_status claq_embedded_info_at(const claq_reader *reader, size_t index, claq_embedded_info *info);
long long claq_find_embedded(const claq_reader *reader, const char *name, size_t name_len);

/* Step 6: checks the embedded file's CRC-32, then decodes it into dst (dst_size >= size). A zlib
 * stream must inflate to exactly size bytes and end exactly at the end of the section. */
claq_status claq_read_embedded(claq_reader *reader, size_t index, void *dst, size_t dst_size, claq_error *err);

/* Step 7: every tensor (header order), every embedded file (header order), then the padding bytes
 * after every section. Without CLAQ_WITH_ZLIB, zlib files get their CRC-32 checked but are not
 * inflated; *uninflated (if not NULL) receives how many were skipped so. */
claq_status claq_validate(claq_reader *reader, size_t *uninflated, claq_error *err);

#ifdef __cplusplus
}
#endif
#endif /* CLAQ_H */
