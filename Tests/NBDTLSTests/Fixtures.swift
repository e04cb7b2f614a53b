// Test credentials made once with Tests/InteropTests/scripts/tlscerts.sh (openssl): a CA,
// its CRL revoking one client certificate, and client certificates from it and from
// another CA. Test data only: these keys protect nothing.
enum Fixtures {
    static let crl = """
        -----BEGIN X509 CRL-----
        MIHaMIGCAgEBMAoGCCqGSM49BAMCMBkxFzAVBgNVBAMMDnRoaW5iZCB0ZXN0IGNh
        Fw0yNjEyMDEwNTMwMTJaFw0yNjEyMDgwNTMwMTJaMCcwJQIUAbQPA1YblYvrWoCe
        vVZ8vkdstWEXDTI2MTIwMTA1MzAxMlqgDzANMAsGA1UdFAQEAgIQADAKBggqhkjO
        PQQDAgNHADBEAiA1Xbv2BkIy9r2JAKgUw99V93k4G3BE/D5OP5qptp/RXQIgaR1Q
        dzTxgXzBWBLjoNMTFQPp6CyGc7Uplw2h4zJFfT8=
        -----END X509 CRL-----
        """
    static let revokedCertificate = """
        -----BEGIN CERTIFICATE-----
        MIIBhDCCASqgAwIBAgIUAbQPA1YblYvrWoCevVZ8vkdstWEwCgYIKoZIzj0EAwIw
        GTEXMBUGA1UEAwwOdGhpbmJkIHRlc3QgY2EwHhcNMjYxMjAxMDUzMDEyWhcNMjYx
        MjA4MDUzMDEyWjASMRAwDgYDVQQDDAdyZXZva2VkMFkwEwYHKoZIzj0CAQYIKoZI
        zj0DAQcDQgAE/fu+9boRs0usBgqTgmMef8sXmD6fZJ87ZrQj//UMqwgZ+E+A9YNJ
        S9dMEUQmuKickj+P0p7jpXj5Tcx9On6C76NXMFUwEwYDVR0lBAwwCgYIKwYBBQUH
        AwIwHQYDVR0OBBYEFOAKdc3mLW53QZuIe4tswA9W8hq1MB8GA1UdIwQYMBaAFHhn
        ONY72lVO9RmZegJljjzRt/raMAoGCCqGSM49BAMCA0gAMEUCIE66mYDnRWL6tqC9
        am/uay/8tz5HFR0/xBSfB3HFFpJgAiEAq5XftD5XyCeRUnlXCRHBWFNCPHMdIRFH
        Es+e2oevi9o=
        -----END CERTIFICATE-----
        """
    static let goodCertificate = """
        -----BEGIN CERTIFICATE-----
        MIIBgzCCASmgAwIBAgIUAbQPA1YblYvrWoCevVZ8vkdstWAwCgYIKoZIzj0EAwIw
        GTEXMBUGA1UEAwwOdGhpbmJkIHRlc3QgY2EwHhcNMjYxMjAxMDUzMDEyWhcNMjYx
        MjA4MDUzMDEyWjARMQ8wDQYDVQQDDAZjbGllbnQwWTATBgcqhkjOPQIBBggqhkjO
        PQMBBwNCAARCrpIQiq/8Droo/fDDdzSppXJbihqanEh/YgNMXRns7miPAq3o9NCx
        B6YkP8gwF6KcjxRdkA3KoO1AcK/sQ3hso1cwVTATBgNVHSUEDDAKBggrBgEFBQcD
        AjAdBgNVHQ4EFgQU5Ae6sVCOxQGQFpneBKQcFnoLWO8wHwYDVR0jBBgwFoAUeGc4
        1jvaVU71GZl6AmWOPNG3+towCgYIKoZIzj0EAwIDSAAwRQIhAKEKwNe9d+hDe0Wr
        bPCu9OLMHHV0JzYinI9gd+gARpgmAiA2WMiIAcapBJAlwQhs7awNFei3F2RasbyR
        0Baxy4GA8w==
        -----END CERTIFICATE-----
        """
    static let foreignCertificate = """
        -----BEGIN CERTIFICATE-----
        MIIBhjCCAS2gAwIBAgIUP+TJBWmOK7H5kP3Q//p8fr/AOnUwCgYIKoZIzj0EAwIw
        HDEaMBgGA1UEAwwRdGhpbmJkIHRlc3Qgb3RoZXIwHhcNMjYxMjAxMDUzMDEyWhcN
        MjYxMjA4MDUzMDEyWjASMRAwDgYDVQQDDAdmb3JlaWduMFkwEwYHKoZIzj0CAQYI
        KoZIzj0DAQcDQgAE8GTW+1yJf+LASiQLh2imb1dR8c+v5ff4IbxCVHuWVv5z/7xb
        XjZeMEIiPF0PQiJDxGDV7Sj0hR9XvuRdif1fA6NXMFUwEwYDVR0lBAwwCgYIKwYB
        BQUHAwIwHQYDVR0OBBYEFNyJweQKEEvIoFT2fkWwYd20yQs8MB8GA1UdIwQYMBaA
        FLcowE4K87K876gfRZF5cQemnOjGMAoGCCqGSM49BAMCA0cAMEQCIHoby45n/9Fn
        Vc+qJnaMvM3q+YaC0SGMurw1eNju6IBFAiADb8/RZ3ssrg/Nm5OQwW1Nb2UASoyF
        bwD+R25wHWx60A==
        -----END CERTIFICATE-----
        """
    static let caCertificate = """
        -----BEGIN CERTIFICATE-----
        MIIBhzCCAS2gAwIBAgIUCmgzgF7IPIRDu9RvbkhSpYbWon0wCgYIKoZIzj0EAwIw
        GTEXMBUGA1UEAwwOdGhpbmJkIHRlc3QgY2EwHhcNMjYxMjAxMDUzMDEyWhcNMjYx
        MjA4MDUzMDEyWjAZMRcwFQYDVQQDDA50aGluYmQgdGVzdCBjYTBZMBMGByqGSM49
        AgEGCCqGSM49AwEHA0IABMUryjT3+WZkMxVamIRAFMpDrkhOC0/5vZQkZoEQZKZm
        17hDUR5WXBNOOaEYmu6TXiZ/32eqU+BEM/gDbpkqr/SjUzBRMB0GA1UdDgQWBBR4
        ZzjWO9pVTvUZmXoCZY480bf62jAfBgNVHSMEGDAWgBR4ZzjWO9pVTvUZmXoCZY48
        0bf62jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDK157oLbsJ
        ftB8exMieU9YZeskfG0y76wjn3pquzqa6wIgaGYpF6KVlpBO/j3yYDuxVwwxKPLZ
        Itd/w2WoAvpVtoA=
        -----END CERTIFICATE-----
        """
    static let serverCertificate = """
        -----BEGIN CERTIFICATE-----
        MIIBojCCAUigAwIBAgIUAbQPA1YblYvrWoCevVZ8vkdstV8wCgYIKoZIzj0EAwIw
        GTEXMBUGA1UEAwwOdGhpbmJkIHRlc3QgY2EwHhcNMjYxMjAxMDUzMDEyWhcNMjYx
        MjA4MDUzMDEyWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggq
        hkjOPQMBBwNCAAQ8yoy2HZrz4JJLiy5l83poZ9W09q/g+Y0sg/tj+4JZ01YJlylp
        FBxKqCcn9rGmbL0g7o4i2uvLT0BQdS9U7Vrqo3MwcTAaBgNVHREEEzARgglsb2Nh
        bGhvc3SHBH8AAAEwEwYDVR0lBAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFCvpNHYv
        ehwacxhfcQbidB2znbtSMB8GA1UdIwQYMBaAFHhnONY72lVO9RmZegJljjzRt/ra
        MAoGCCqGSM49BAMCA0gAMEUCIFTQIY+h+ja3SP8T6tQ/lTjO1geKWXsLoR2+GPAa
        hLBTAiEA9ljnPmjFx/GbAilwS210IlXFcx08vpVjMHH+ts1cyzU=
        -----END CERTIFICATE-----
        """
    static let serverKey = """
        -----BEGIN PRIVATE KEY-----
        MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgIMESjVZnfuPErtYi
        E7/xD9pXqdfDoFkR8Ops7KuzNlmhRANCAAQ8yoy2HZrz4JJLiy5l83poZ9W09q/g
        +Y0sg/tj+4JZ01YJlylpFBxKqCcn9rGmbL0g7o4i2uvLT0BQdS9U7Vrq
        -----END PRIVATE KEY-----
        """
}
