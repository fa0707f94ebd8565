/*
 * claq_dump - validate a .claq file completely and dump its decoded contents (see README.md).
 *
 *   claq_dump [-q] FILE
 *
 * Runs every check of the spec (open, then claq_validate: all tensors, all embedded files, padding),
 * then decodes every tensor and reads every embedded file. On success it prints
 *
 *   ok <version> <tensor count> <file count>
 *   T <name> <raw|claq> <ndim> <dim>...          one per tensor, in header order, each followed by
 *   V <count> <hex>...                             its float32 values (row-major) as 8-hex-digit bit patterns
 *   F <name> <none|zlib> <size> <hex|->            one per embedded file: its decoded bytes in hex
 *                                                  ("-" when zlib-encoded and built without zlib)
 *
 * where <name> is '=' followed by the name's UTF-8 bytes in hex. With -q only the line "ok ..." is printed,
 * after everything has been decoded. On failure it prints one line,
 *
 *   error <Category>: <message>
 *
 * and exits with status 1. A usage error exits with status 2.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "claq.h"

static const char HEX[] = "0123456789abcdef";

static void put_name(const char *s, size_t n) {
    size_t i;
    putchar('=');
    for (i = 0; i < n; i++) {
        putchar(HEX[((unsigned char)s[i]) >> 4]);
        putchar(HEX[((unsigned char)s[i]) & 15]);
    }
}

static int report(const claq_error *e) {
    printf("error %s: %s\n", claq_status_name(e->status), e->message);
    return 1;
}

int main(int argc, char **argv) {
    claq_reader *r = NULL;
    claq_error e;
    size_t i, uninflated = 0, nt, nf;
    int quiet = 0;
    const char *path;
    if (argc == 3 && strcmp(argv[1], "-q") == 0) {
        quiet = 1;
        path = argv[2];
    } else if (argc == 2 && strcmp(argv[1], "-q") != 0) {
        path = argv[1];
    } else {
        fprintf(stderr, "usage: claq_dump [-q] FILE\n");
        return 2;
    }
    if (claq_open_path(path, &r, &e) != CLAQ_OK) return report(&e);
    if (claq_validate(r, &uninflated, &e) != CLAQ_OK) {
        claq_close(r);
        return report(&e);
    }
    nt = claq_tensor_count(r);
    nf = claq_embedded_count(r);
    if (!quiet) printf("ok %u %lu %lu\n", claq_version(r), (unsigned long)nt, (unsigned long)nf);
    for (i = 0; i < nt; i++) {
        claq_tensor_info info;
        float *values;
        uint64_t k;
        unsigned d;
        claq_tensor_info_at(r, i, &info);
        /* validated: count is at most 8 * the file's size (claq) or its data's length (raw) */
        values = info.count <= (uint64_t)((size_t)-1 / sizeof(float))
                     ? (float *)malloc(info.count ? (size_t)info.count * sizeof(float) : 1) : NULL;
        if (!values) {
            claq_close(r);
            printf("error OutOfMemory: cannot hold a decoded tensor\n");
            return 1;
        }
        if (claq_decode_tensor(r, i, values, (size_t)info.count, &e) != CLAQ_OK) {
            free(values);
            claq_close(r);
            return report(&e);
        }
        if (!quiet) {
            fputs("T ", stdout);
            put_name(info.name, info.name_len);
            printf(" %s %u", info.kind == CLAQ_KIND_CLAQ ? "claq" : "raw", info.ndim);
            for (d = 0; d < info.ndim; d++) printf(" %llu", (unsigned long long)info.shape[d]);
            printf("\nV %llu", (unsigned long long)info.count);
            for (k = 0; k < info.count; k++) {
                char text[10];
                uint32_t bits;
                int m;
                memcpy(&bits, &values[k], sizeof bits); /* the float32's bit pattern */
                text[0] = ' ';
                for (m = 0; m < 8; m++) text[1 + m] = HEX[(bits >> (28 - 4 * m)) & 15u];
                text[9] = '\0';
                fputs(text, stdout);
            }
            putchar('\n');
        }
        free(values);
    }
    for (i = 0; i < nf; i++) {
        claq_embedded_info info;
        unsigned char *bytes;
        uint64_t k;
        claq_embedded_info_at(r, i, &info);
        if (!quiet) {
            fputs("F ", stdout);
            put_name(info.name, info.name_len);
            printf(" %s %llu ", info.zlib ? "zlib" : "none", (unsigned long long)info.size);
        }
        if (info.zlib && !claq_have_zlib()) {
            if (!quiet) fputs("-\n", stdout);
            continue;
        }
        bytes = (unsigned char *)malloc((size_t)info.size); /* size <= 2^28 (version 2) or the stored length */
        if (!bytes) {
            claq_close(r);
            printf("error OutOfMemory: cannot hold an embedded file\n");
            return 1;
        }
        if (claq_read_embedded(r, i, bytes, (size_t)info.size, &e) != CLAQ_OK) {
            free(bytes);
            claq_close(r);
            return report(&e);
        }
        if (!quiet) {
            for (k = 0; k < info.size; k++) {
                putchar(HEX[bytes[k] >> 4]);
                putchar(HEX[bytes[k] & 15]);
            }
            putchar('\n');
        }
        free(bytes);
    }
    if (quiet) printf("ok %u %lu %lu\n", claq_version(r), (unsigned long)nt, (unsigned long)nf);
    claq_close(r);
    (void)uninflated; /* zlib files not inflated (no CLAQ_WITH_ZLIB) are shown as "-" in their F line */
    return fflush(stdout) == 0 ? 0 : 1;
}
